"""Experiment tracking from rank 0: one metrics record type feeds TensorBoard, MLflow and Weights & Biases.

Every sink that `tracking.*` turns on gets the same `Record`s (a step, named values, train or eval; logged as
`<kind>/<name>`), the same run parameters (the resolved config flattened to dotted keys), library versions and
tags: TensorBoard event files always (`<local dir>/tensorboard`), an MLflow run when `tracking.mlflow_uri` is set,
a W&B run when `tracking.wandb_project` is set (the optional extra `wandb`). Nothing is imported or written on
import: a `Tracker` is built from the plain config inside the process that logs (rank 0 of a Ray Train group).

Resume. A tracker opened again on the same run folder continues the same runs: MLflow's run is the one whose tag
`arena.run_dir` is the folder, W&B's run id is derived from the folder (resume="allow"), and TensorBoard's writer
purges the events an earlier attempt wrote at steps from `first_step` on. MLflow cannot delete values, so it skips
a key's steps up to the last one the server already holds: after a resume it keeps the first attempt's values of
the replayed steps, TensorBoard the new ones. W&B drops steps below its run's current step itself. Within one
tracker, a key's value at a step it has already logged is dropped, for every sink alike.

Failures. A tracker that is down never stops training. Every sink call is guarded: the first failure logs one
warning naming the sink and the error and disables that sink (`Tracker.status()` says why, for the run's summary).
MLflow's and W&B's calls are queued to a daemon thread per sink, so that training does not wait for the network;
only `Tracker.close` waits for them, FAILURE_BUDGET_S at most for all sinks together, then gives up on what is
left (the sink is disabled; a hanging call ends with its HTTP timeout). MLflow's HTTP client is set to
`tracking.timeout_s` per request and no retries through MLFLOW_HTTP_REQUEST_TIMEOUT / MLFLOW_HTTP_REQUEST_MAX_RETRIES
(process-wide; values already in the environment are kept, and the budget still bounds the wait), so a server
that stops answering is found out by the first request after `timeout_s`, and its later calls are dropped unsent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from app import hardware

log = logging.getLogger(__name__)

RUN_DIR_TAG = "arena.run_dir"  # MLflow: how a resumed run finds its MLflow run
RUN_GROUP_TAG = "arena.run_group"
GROUP_RUN_TAG = "arena.group_run"  # MLflow: the parent run of a group (a sweep, a cv member), by the group's name
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: its UI nests a run under this parent
BEST_CHECKPOINT_TAG = "arena.best_checkpoint"
VERSION_TAG = "arena.version.{library}"
FAILURE_BUDGET_S = 5.0  # the most time Tracker.close waits for MLflow and W&B together (nothing else waits)
LIBRARIES = ("torch", "transformers", "ray", "peft", "deepspeed")
MAX_PENDING_CALLS = 10_000  # a remote sink this far behind is disabled (memory, and close's wait)
MLFLOW_BATCH = 100  # params or tags per MLflow log_batch (the server's limit; metrics allow 1000)
MLFLOW_PARAM_CHARS = 6000  # longest MLflow parameter value
CHECKPOINT_EVENTS_DIR = "tracking/tensorboard"  # where a checkpoint of an s3:// run carries the TensorBoard events


class TrackingConfig(BaseModel):
    """Where a training run's metrics go: TensorBoard always, MLflow and W&B when named (app/tracking.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mlflow_uri: str | None = Field(
        None, min_length=1, description="MLflow tracking URI (http://host:5000, or a store URI); None = no MLflow")
    mlflow_experiment: str = Field("arena", min_length=1,
                                   description="MLflow experiment of the run (created if missing)")
    wandb_project: str | None = Field(
        None, min_length=1, description="W&B project; None = no W&B (needs the optional extra: pip install .[wandb])")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline writes W&B's files locally only (`wandb sync` uploads them later)")
    run_name: str | None = Field(None, min_length=1,
                                 description="display name of the run; None = the run folder's name")
    run_group: str | None = Field(
        None, min_length=1, description="groups runs, e.g. a sweep's or a cv run's name: MLflow tag arena.run_group, "
                                    "W&B group")
    local_dir: str | None = Field(
        None, min_length=1, description="local folder of TensorBoard events and W&B files; None = <run dir>/tracking, "
                                    "or for a URI run dir a folder under the system temp folder")
    timeout_s: int = Field(
        2, ge=1, le=5, description="seconds one MLflow request may take (no retries) before MLflow is disabled for "
                                   "the run; MLflow reads whole seconds")
    peak_tflops_per_device: float | None = Field(
        None, gt=0, description="dense bf16 peak TFLOP/s of one training device, for MFU; None = from the GPU's name "
                                "(PEAK_BF16_FLOPS); a CPU or an unknown GPU then logs no MFU")


@dataclass(frozen=True)
class Record:
    """Named values of one optimizer step; every sink logs each as `<kind>/<name>` at `step`.

    Raises:
        ValueError: a negative or non-integer step, or another kind.
        TypeError: a value that is not a number (the message names it).
    """

    step: int
    values: Mapping[str, float]
    kind: Literal["train", "eval"] = "train"

    def __post_init__(self) -> None:
        if self.kind not in ("train", "eval"):
            raise ValueError(f"Record.kind must be 'train' or 'eval', got {self.kind!r}")
        try:
            step = operator.index(self.step)
        except TypeError:
            raise ValueError(f"Record.step must be an integer optimizer step, got {self.step!r}") from None
        if step < 0:
            raise ValueError(f"Record.step must be >= 0, got {step}")
        values = {}
        for name, value in self.values.items():
            try:
                values[str(name)] = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"Record value {name!r} must be a number, got {value!r}") from None
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "values", values)

    def metrics(self) -> dict[str, float]:
        """The values under the names every sink logs them: `<kind>/<name>`."""
        return {f"{self.kind}/{name}": value for name, value in self.values.items()}


def config_params(config: BaseModel | Mapping[str, Any]) -> dict[str, str]:
    """A run's parameters: the resolved config (a pydantic model or a nested dict) flattened to dotted keys, values
    as text (strings as they are, everything else as JSON: null, true, 5e-05, [1, 2])."""
    raw = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in _flatten(raw)}


def _flatten(raw: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in raw.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide a run's numbers (those not installed are left out)."""
    versions = {}
    for library in LIBRARIES:
        try:
            versions[library] = metadata.version(library)
        except metadata.PackageNotFoundError:
            continue
    return versions


def default_local_dir(run_dir: str) -> str:
    """`<run dir>/tracking` for a local run folder; for a URI (s3://...) a folder of its own in the system temp
    folder (event files are written locally)."""
    if "://" not in run_dir:
        return os.path.join(run_dir, "tracking")
    return os.path.join(tempfile.gettempdir(), "arena-tracking", hashlib.sha256(run_dir.encode()).hexdigest()[:16])


def wandb_run_id(run_dir: str) -> str:
    """W&B's id of the run in `run_dir`: the same for every attempt of the run, so W&B resumes it."""
    return "arena-" + hashlib.sha256(run_dir.encode()).hexdigest()[:24]


# Dense (no 2:4 sparsity) bf16 tensor-core peaks, FLOP/s per device, by Ray accelerator type: app/hardware.py's
# GPUs, and the L4 (NVIDIA's L4 datasheet: 242 TFLOPS bf16 with sparsity, half of it dense).
PEAK_BF16_FLOPS: dict[str, float] = {
    **{gpu.ray_type: gpu.peak_bf16_tflops * 1e12 for gpu in (hardware.A10G, hardware.A100_40GB, hardware.H100_80GB)},
    "L4": 121e12,
    "H200": 989e12,  # NVIDIA's H200 datasheet: 1,979 TFLOPS bf16 with sparsity, the H100 SXM's dense figure
}


def peak_flops(accelerator: str) -> float:
    """Dense bf16 peak FLOP/s of one `accelerator` (a Ray accelerator type such as H100; any case).

    Raises:
        ValueError: an accelerator not in PEAK_BF16_FLOPS, listing those that are.
    """
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() == accelerator.lower():
            return flops
    raise ValueError(f"no peak FLOP/s known for accelerator {accelerator!r}; known: {sorted(PEAK_BF16_FLOPS)}. Pass "
                     "peak_flops_per_device instead (a CPU's, or another GPU's datasheet dense bf16 figure)")


def mfu(params: int, tokens_per_s: float, devices: int = 1, *, accelerator: str | None = None,
        peak_flops_per_device: float | None = None, layers: int = 0, hidden: int = 0, seq_len: int = 0) -> float:
    """Model FLOPs utilisation: the share of the devices' peak FLOP/s that training the model at this speed needs.

        MFU = (6 N + 12 L H S) x tokens_per_s / (peak x devices)

    6 N (Kaplan et al. 2020): 2 FLOPs per parameter and token in the forward pass, 4 in the backward pass, with N
    the non-embedding parameters (embeddings are lookups). 12 L H S (PaLM, Chowdhery et al. 2022, appendix B): the
    attention matmuls that hold no parameters, Q K^T and scores x V, 2 x 2 x S x H FLOPs per token and layer
    forward, 3 times that with the backward pass, over all S positions (no halving for a causal mask); counted
    only when layers, hidden and seq_len are all given. Recomputation (gradient checkpointing) is not counted:
    MFU measures the model's FLOPs, not the hardware's.

    Args:
        params: non-embedding parameters N (all of them, also with LoRA: the pass goes through the frozen weights).
        tokens_per_s: real (non-pad) tokens trained per second by all devices together.
        devices: accelerators (or CPU workers) sharing that rate.
        accelerator: a Ray accelerator type of PEAK_BF16_FLOPS (H100, A100, L4, A10G); or else
        peak_flops_per_device: the peak FLOP/s of one device, e.g. a CPU's.
        layers, hidden, seq_len: transformer layers L, hidden size H and attended sequence length S.

    Raises:
        ValueError: both or neither of accelerator and peak_flops_per_device, a partial attention shape, or a
            non-positive count.
    """
    if (accelerator is None) == (peak_flops_per_device is None):
        raise ValueError("give exactly one of accelerator (e.g. 'H100') and peak_flops_per_device (e.g. a CPU's)")
    peak = peak_flops(accelerator) if accelerator is not None else float(peak_flops_per_device)
    if params <= 0 or devices <= 0 or peak <= 0 or tokens_per_s < 0:
        raise ValueError(f"mfu needs params > 0, devices > 0, a peak > 0 and tokens_per_s >= 0; got params={params}, "
                         f"devices={devices}, peak={peak}, tokens_per_s={tokens_per_s}")
    attention = (layers, hidden, seq_len)
    if any(attention) and not all(value > 0 for value in attention):
        raise ValueError(f"attention FLOPs need layers, hidden and seq_len all > 0 (or none); got {attention}")
    flops_per_token = 6.0 * params + 12.0 * layers * hidden * seq_len
    return flops_per_token * tokens_per_s / (peak * devices)


class Sink(Protocol):
    """One tracking backend. The Tracker guards every call; a sink raises on any failure."""

    def open(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None: ...

    def write(self, record: Record) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_summary(self, summary: Mapping[str, Any], text: str) -> None: ...

    def close(self, failed: bool) -> None: ...

    def target(self) -> str: ...


class TensorBoardSink:
    """Event files in `folder` (tensorboardX). `first_step`: TensorBoard purges events an earlier writer of the
    folder wrote at steps >= it (None: append to them)."""

    def __init__(self, folder: str, first_step: int | None) -> None:
        from tensorboardX import SummaryWriter

        os.makedirs(folder, exist_ok=True)
        self.folder, self._step = folder, first_step or 0
        # tensorboardX names files by the second: the suffix keeps two writers of one second apart, in order
        self._writer = SummaryWriter(folder, purge_step=first_step, flush_secs=10, filename_suffix=f".{time.time_ns()}")

    def open(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        rows = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self._writer.add_text("params", "| key | value |\n| --- | --- |\n" + rows, self._step)
        self.set_tags(tags)

    def write(self, record: Record) -> None:
        for key, value in record.metrics().items():
            self._writer.add_scalar(key, value, record.step)
        self._step = max(self._step, record.step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._writer.add_text(f"tags/{key}", value, self._step)

    def log_summary(self, summary: Mapping[str, Any], text: str) -> None:
        self._writer.add_text("summary", f"```\n{text}\n```", self._step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self, failed: bool) -> None:
        self._writer.close()

    def target(self) -> str:
        return self.folder


class MlflowSink:
    """One MLflow run per training run, found again on resume by its tag `arena.run_dir`."""

    def __init__(self, uri: str, experiment: str, run_dir: str, run_name: str, timeout_s: int,
                 group: str | None = None) -> None:
        # Read by MLflow's HTTP client at each request; a value the environment already has wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self._client = MlflowClient(tracking_uri=uri)
        self.uri, self.experiment, self.run_dir, self.run_name, self.group = uri, experiment, run_dir, run_name, group
        self.run_id: str | None = None
        self._last: dict[str, int] = {}  # key -> last step the server holds

    def open(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        experiment_id = self._experiment_id()
        quote = "'" if "'" not in self.run_dir else '"'
        found = self._client.search_runs([experiment_id], f"tags.`{RUN_DIR_TAG}` = {quote}{self.run_dir}{quote}",
                                         max_results=1, order_by=["attributes.start_time DESC"])
        old_params: Mapping[str, str] = {}
        if found:
            run = found[0]
            self.run_id, old_params = run.info.run_id, run.data.params
            for key in run.data.metrics:
                self._last[key] = max((m.step for m in self._client.get_metric_history(self.run_id, key)), default=-1)
            if run.info.status != "RUNNING":
                self._client.update_run(self.run_id, status="RUNNING")
        else:
            parent = {PARENT_RUN_TAG: self._group_run(experiment_id)} if self.group else {}
            self.run_id = self._client.create_run(experiment_id, tags={**tags, **parent},
                                                  run_name=self.run_name).info.run_id
        params = {key: value[:MLFLOW_PARAM_CHARS] for key, value in params.items()}
        if changed := sorted(key for key, value in params.items() if old_params.get(key, value) != value):
            log.warning("MLflow run %s keeps the first values of parameters %s: MLflow parameters cannot change",
                        self.run_id, ", ".join(changed))
        new = [self._Param(key, value) for key, value in params.items() if key not in old_params]
        for start in range(0, len(new), MLFLOW_BATCH):
            self._client.log_batch(self.run_id, params=new[start:start + MLFLOW_BATCH], synchronous=True)
        self.set_tags(tags)

    def _group_run(self, experiment_id: str) -> str:
        """The id of the MLflow run that stands for the group (a sweep, a cv member): the parent that MLflow's UI
        nests the group's runs under. Runs of one group that start at once may each create one; all of them then
        take the oldest, and the others' creators delete theirs."""
        quote = "'" if "'" not in self.group else '"'
        query = f"tags.`{GROUP_RUN_TAG}` = {quote}{self.group}{quote}"

        def oldest() -> str | None:
            runs = self._client.search_runs([experiment_id], query, max_results=1,
                                            order_by=["attributes.start_time ASC", "attributes.run_id ASC"])
            return runs[0].info.run_id if runs else None

        if (found := oldest()) is not None:
            return found
        created = self._client.create_run(experiment_id, tags={GROUP_RUN_TAG: self.group},
                                          run_name=self.group).info.run_id
        self._client.set_terminated(created, status="FINISHED")
        if (found := oldest()) != created:
            self._client.delete_run(created)
        return found or created

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        existing = self._client.get_experiment_by_name(self.experiment)
        if existing is None:
            try:
                return self._client.create_experiment(self.experiment)
            except MlflowException:  # another run created it meanwhile
                existing = self._client.get_experiment_by_name(self.experiment)
                if existing is None:
                    raise
        if existing.lifecycle_stage != "active":
            raise RuntimeError(f"MLflow experiment {self.experiment!r} is deleted: restore it, or set "
                               "tracking.mlflow_experiment to another name")
        return existing.experiment_id

    def write(self, record: Record) -> None:
        timestamp = int(time.time() * 1000)
        fresh = {key: value for key, value in record.metrics().items() if record.step > self._last.get(key, -1)}
        if fresh:
            self._client.log_batch(self.run_id, metrics=[self._Metric(key, value, timestamp, record.step)
                                                         for key, value in fresh.items()], synchronous=True)
            self._last.update(dict.fromkeys(fresh, record.step))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        items = [self._RunTag(key, value) for key, value in tags.items()]
        for start in range(0, len(items), MLFLOW_BATCH):
            self._client.log_batch(self.run_id, tags=items[start:start + MLFLOW_BATCH], synchronous=True)

    def log_summary(self, summary: Mapping[str, Any], text: str) -> None:
        self._client.log_text(self.run_id, text, "summary.json")

    def close(self, failed: bool) -> None:
        self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def target(self) -> str:
        return f"{self.uri} experiment {self.experiment} run {self.run_id}"


class WandbSink:
    """One W&B run per training run; its id comes from the run folder, so every attempt resumes it."""

    def __init__(self, project: str, mode: str, folder: str, run_dir: str, run_name: str, group: str | None) -> None:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("tracking.wandb_project is set but wandb is not installed: pip install "
                               "'arena-prefs[wandb]', or set tracking.wandb_project=null") from None
        self._wandb, self._run = wandb, None
        self.project, self.mode, self.folder, self.run_name, self.group = project, mode, folder, run_name, group
        self.run_id = wandb_run_id(run_dir)

    def open(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        os.makedirs(self.folder, exist_ok=True)
        # console off: Ray already collects the worker's output; reinit: a process may hold several runs (tests).
        # init may take W&B's own init_timeout (90 s) on this sink's thread: only Tracker.close waits for it.
        settings = self._wandb.Settings(console="off", silent=True)
        self._run = self._wandb.init(project=self.project, id=self.run_id, resume="allow", mode=self.mode,
                                     dir=self.folder, name=self.run_name, group=self.group, reinit="create_new",
                                     settings=settings)
        self._run.config.update(dict(params), allow_val_change=True)
        self.set_tags(tags)

    def write(self, record: Record) -> None:
        self._run.log(record.metrics(), step=record.step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._run.summary.update(dict(tags))

    def log_summary(self, summary: Mapping[str, Any], text: str) -> None:
        plain = (str, int, float, bool)
        self._run.summary.update({f"summary.{key}": value for key, value in _flatten(json.loads(text))
                                  if isinstance(value, plain)})

    def close(self, failed: bool) -> None:
        self._run.finish(exit_code=1 if failed else 0)

    def target(self) -> str:
        return f"{self.mode} run {self.run_id} of project {self.project} in {self.folder}"


class _Slot:
    """One sink and its state: working (reason None) or disabled, with why. A remote sink's calls go through a
    queue to a daemon thread of its own, so that training never waits for the network."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sink: Sink | None = None
        self.reason: str | None = None
        self._calls: queue.Queue[tuple[str, Callable[[], None]] | None] | None = None
        self._idle = threading.Event()  # the thread has ended: every queued call is done or dropped
        self._lock = threading.Lock()  # the caller and the sink's thread may both disable it

    def start_thread(self) -> None:
        self._calls = queue.Queue(maxsize=MAX_PENDING_CALLS)
        threading.Thread(target=self._serve, name=f"tracking-{self.name}", daemon=True).start()

    def call(self, what: str, function: Callable[[], None]) -> None:
        """Run `function` now (a local sink) or queue it (a remote one); its first failure disables the sink."""
        if self.reason is not None:
            return
        if self._calls is None:
            self._run(what, function)
            return
        try:
            self._calls.put_nowait((what, function))
        except queue.Full:
            self.disable(f"fell {MAX_PENDING_CALLS} calls behind (the tracker answers too slowly)")

    def _serve(self) -> None:
        assert self._calls is not None
        while (item := self._calls.get()) is not None:
            if self.reason is None:  # a disabled sink's queue is drained unrun
                self._run(*item)
        self._idle.set()

    def _run(self, what: str, function: Callable[[], None]) -> None:
        started = time.monotonic()
        try:
            function()
        except Exception as error:  # a tracker must never stop training
            self.disable(f"{what} failed after {time.monotonic() - started:.1f} s: {type(error).__name__}: {error}")

    def finish(self, deadline: float) -> None:
        """Wait until the queued calls are done, or until `deadline` (time.monotonic()); then the sink is disabled.
        A disabled sink is not waited for: what it still has queued is dropped."""
        if self._calls is None:
            return
        try:
            self._calls.put(None, timeout=max(deadline - time.monotonic(), 0.001))
            ended = self.reason is not None or self._idle.wait(max(deadline - time.monotonic(), 0))
        except queue.Full:
            ended = False
        if not ended:
            self.disable(f"close() gave up on it after waiting {FAILURE_BUDGET_S:g} s ({self._calls.qsize()} calls "
                         "still queued behind the one running)")

    def disable(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
        log.warning("tracking: %s disabled for the rest of the run: %s", self.name, reason)


class Tracker:
    """The sinks of one training run, used from rank 0 only; built from the plain config in that process.

    Only `close` waits for MLflow and W&B (at most FAILURE_BUDGET_S): the other calls queue their work. Use the
    tracker as a context manager, or call `close` in a `finally`.

    Args:
        settings: the `tracking` section (a TrackingConfig, or any object with its attributes).
        run_dir: the run's folder (local or URI): it names the run for MLflow (tag arena.run_dir) and W&B (its id).
        first_step: the first optimizer step this tracker logs: 0 for a fresh run, the checkpoint's step + 1 on a
            resume; TensorBoard purges an earlier attempt's events at and after it. None: purge nothing (a tracker
            opened to add a summary to a finished run).
        params: run parameters, normally `config_params(config)`.
        tags: text tags of the run (the library versions and run folder are added).
        resumed_from: the local folder of the checkpoint the run resumes from: where this node has no TensorBoard
            events of the run yet (a run on s3:// storage restarted on another node), the ones the checkpoint
            carries are copied in first (`checkpoint_events`).
    """

    def __init__(self, settings: Any, run_dir: str, *, first_step: int | None = None,
                 params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None,
                 resumed_from: str | None = None) -> None:
        self.run_dir = run_dir
        self.local_dir = settings.local_dir or default_local_dir(run_dir)
        self.events_dir = os.path.join(self.local_dir, "tensorboard")  # TensorBoard's event files
        if resumed_from is not None:
            restore_events(resumed_from, self.events_dir)
        run_name = settings.run_name or run_dir.rstrip("/").rsplit("/", 1)[-1]
        all_tags = {RUN_DIR_TAG: run_dir, **({RUN_GROUP_TAG: settings.run_group} if settings.run_group else {}),
                    **{VERSION_TAG.format(library=name): version for name, version in library_versions().items()},
                    **{key: str(value) for key, value in (tags or {}).items()}}
        params = {key: str(value) for key, value in (params or {}).items()}
        self._last_step: dict[str, int] = {}
        self._closed = False
        builders: list[tuple[str, bool, Callable[[], Sink]]] = [
            ("tensorboard", False, lambda: TensorBoardSink(self.events_dir, first_step))]
        if settings.mlflow_uri:
            builders.append(("mlflow", True, lambda: MlflowSink(settings.mlflow_uri, settings.mlflow_experiment,
                                                                 run_dir, run_name, settings.timeout_s,
                                                                 settings.run_group)))
        if settings.wandb_project:
            builders.append(("wandb", True, lambda: WandbSink(settings.wandb_project, settings.wandb_mode,
                                                               self.local_dir, run_dir, run_name, settings.run_group)))
        self._slots: list[_Slot] = []
        for name, remote, build in builders:
            slot = _Slot(name)
            self._slots.append(slot)
            try:  # imports and local set-up, in the caller's thread (no network)
                slot.sink = build()
            except Exception as error:  # a tracker must never stop training
                slot.disable(f"could not be set up: {type(error).__name__}: {error}")
                continue
            if remote:
                slot.start_thread()
            slot.call("opening the run", lambda sink=slot.sink: sink.open(params, all_tags))

    def log(self, record: Record) -> None:
        """Send the record's values to every working sink; a key's value at a step it already has is dropped."""
        if self._closed:
            raise RuntimeError("Tracker.log after close(): open a new Tracker")
        fresh = {name: value for name, value in record.values.items()
                 if record.step > self._last_step.get(f"{record.kind}/{name}", -1)}
        if not fresh:
            return
        self._last_step.update(dict.fromkeys((f"{record.kind}/{name}" for name in fresh), record.step))
        record = replace(record, values=fresh)
        for slot in self._slots:
            slot.call(f"logging step {record.step}", lambda sink=slot.sink: sink.write(record))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Text tags of the run (MLflow tags, W&B summary entries, TensorBoard text)."""
        tags = {key: str(value) for key, value in tags.items()}
        for slot in self._slots:
            slot.call("setting tags", lambda sink=slot.sink: sink.set_tags(tags))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """The run's summary as JSON (MLflow artifact summary.json, W&B summary, TensorBoard text); its
        `best_checkpoint`, when there is one, also becomes the tag arena.best_checkpoint."""
        text = json.dumps(summary, indent=2, sort_keys=True, default=str)
        for slot in self._slots:
            slot.call("logging the summary", lambda sink=slot.sink: sink.log_summary(summary, text))
        if summary.get("best_checkpoint"):
            self.set_tags({BEST_CHECKPOINT_TAG: str(summary["best_checkpoint"])})

    def flush(self) -> None:
        """Write TensorBoard's buffered events to its files (before they are copied with a checkpoint)."""
        for slot in self._slots:
            if slot.name == "tensorboard":
                slot.call("flushing", lambda sink=slot.sink: sink.flush())

    def status(self) -> dict[str, dict[str, Any]]:
        """Per sink: {"ok": bool, "reason": why it is disabled or None, "target": where it logs} (JSON-able).
        Final once `close` has returned; before, a remote sink's failure shows once its queued call has failed."""
        return {slot.name: {"ok": slot.reason is None, "reason": slot.reason,
                            "target": slot.sink.target() if slot.sink is not None else None}
                for slot in self._slots}

    def close(self, failed: bool = False) -> None:
        """End every sink's run (MLflow status FAILED / W&B exit code 1 when `failed`), waiting at most
        FAILURE_BUDGET_S in all for the remote sinks' queued calls; idempotent."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            slot.call("closing the run", lambda sink=slot.sink: sink.close(failed))
        deadline = time.monotonic() + FAILURE_BUDGET_S
        for slot in self._slots:
            slot.finish(deadline)

    def finish(self, summary: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """End a run that trained to its end: log its `summary` (when given), close, copy the TensorBoard events to
        the run's storage (`publish_events`); returns the final `status`."""
        if summary is not None:
            self.log_summary(summary)
        self.close()
        publish_events(self)
        return self.status()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(failed=kind is not None)


# ---- what a training step logs (used by app/loop.py on every rank; only rank 0 sends it anywhere) ----

def device_peak_flops(device: Any, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one training device for MFU: `peak_tflops` (`tracking.peak_tflops_per_device`) when given,
    else the GPU's by its name (a word of torch's device name, e.g. 'NVIDIA H100 80GB HBM3'); None for a CPU or a
    GPU not in PEAK_BF16_FLOPS."""
    import re

    import torch

    if peak_tflops is not None:
        return peak_tflops * 1e12
    if getattr(device, "type", str(device)) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for accelerator, flops in PEAK_BF16_FLOPS.items():
        if re.search(rf"\b{re.escape(accelerator)}\b", name, re.IGNORECASE):
            return flops
    return None


def model_shape(model: Any) -> tuple[int, int, int]:
    """(non-embedding parameters, layers, hidden size) of a Hugging Face model, also inside a DDP / DeepSpeed / PEFT
    wrapper and under ZeRO-3 (whose partitioned parameters count their full size, `ds_numel`). Embedding tables are
    lookups, not matmuls: MFU leaves them out (`mfu`); a tied output projection is counted once, as an embedding."""
    import torch

    inner = getattr(model, "module", model)
    embeddings = {id(module.weight) for module in inner.modules() if isinstance(module, torch.nn.Embedding)}
    seen, params = set(), 0
    for param in inner.parameters():
        if id(param) in seen or id(param) in embeddings:
            continue
        seen.add(id(param))
        params += int(getattr(param, "ds_numel", param.numel()))
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None) or 0
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or 0
    return params, int(layers), int(hidden)


def memory_values(device: Any) -> dict[str, float]:
    """Accelerator memory in GiB (allocated now, and the peak since the last call, which resets it) on a GPU; the
    process's resident host memory (now, and its peak over the process's life) on a CPU."""
    import resource

    import torch

    gib = float(1 << 30)
    if getattr(device, "type", str(device)) == "cuda":
        values = {"memory_allocated_gib": torch.cuda.memory_allocated(device) / gib,
                  "memory_peak_gib": torch.cuda.max_memory_allocated(device) / gib}
        torch.cuda.reset_peak_memory_stats(device)
        return values
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        with open("/proc/self/statm") as statm:
            resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        resident = peak_kib * 1024
    return {"host_rss_gib": resident / gib, "host_peak_rss_gib": peak_kib * 1024 / gib}


class StepMeter:
    """What the optimizer steps since the last logged one did, summed over all ranks: `add` per micro-batch,
    `record` at a logged step (every rank calls it: the sums meet in one all-reduce; the step's gradient norm and
    learning rates are the same on every rank). Step time and rates count from the last record or `restart`."""

    def __init__(self, model: Any, settings: Any, device: Any, world: int) -> None:
        self.device, self.world = device, world
        self.params, self.layers, self.hidden = model_shape(model)
        self.peak = device_peak_flops(device, settings.peak_tflops_per_device)
        self.restart(0)

    def restart(self, step: int) -> None:
        """Count from now and from optimizer step `step` (an epoch's start, after an evaluation or a checkpoint)."""
        self.since_step, self.started = step, time.perf_counter()
        self.sums = [0.0] * 5  # loss sum, micro-batches, real tokens, padded tokens, sequences

    def add(self, loss: float, real_tokens: int, padded_tokens: int, sequences: int) -> None:
        for index, value in enumerate((loss, 1, real_tokens, padded_tokens, sequences)):
            self.sums[index] += value

    def record(self, step: int, grad_norm: float | None, lrs: list[float]) -> Record:
        import torch

        from app import collectives

        sums = torch.tensor(self.sums, dtype=torch.float64)
        if self.world > 1 and collectives.is_distributed():
            sums = collectives.all_reduce(sums, self.device).cpu()
        loss_sum, batches, real, padded, sequences = sums.tolist()
        seconds = max(time.perf_counter() - self.started, 1e-9)
        steps = max(step - self.since_step, 1)
        values = {"loss": loss_sum / max(batches, 1), "real_tokens_per_s": real / seconds,
                  "padded_tokens_per_s": padded / seconds, "rows_per_s": sequences / seconds,
                  "step_time_s": seconds / steps, "real_token_share": real / max(padded, 1),
                  **memory_values(self.device)}
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        values["lr"] = lrs[0]
        if len(set(lrs)) > 1:
            values.update({f"lr_group_{index}": lr for index, lr in enumerate(lrs)})
        if self.peak is not None and self.params > 0:
            values["mfu"] = mfu(self.params, real / seconds, self.world, peak_flops_per_device=self.peak,
                                **self._attention(padded, sequences))
        self.restart(step)
        return Record(step, values)

    def _attention(self, padded: float, sequences: float) -> dict[str, int]:
        seq_len = round(padded / sequences) if sequences else 0
        if self.layers and self.hidden and seq_len:
            return {"layers": self.layers, "hidden": self.hidden, "seq_len": seq_len}
        return {}


def restore_events(checkpoint_dir: str, events_dir: str) -> bool:
    """Copy the TensorBoard events a checkpoint carries (`checkpoint_events`) into `events_dir` when that has none
    (Tracker's `resumed_from`); True when it did."""
    import shutil

    source = os.path.join(checkpoint_dir, CHECKPOINT_EVENTS_DIR)
    if not os.path.isdir(source) or (os.path.isdir(events_dir) and os.listdir(events_dir)):
        return False
    try:
        shutil.copytree(source, events_dir, dirs_exist_ok=True)
    except OSError as error:  # a tracker must never stop training
        log.warning("tracking: could not restore the TensorBoard events of %s into %s: %s", checkpoint_dir,
                    events_dir, error)
        return False
    return True


def checkpoint_events(tracker: Tracker, checkpoint_dir: str) -> None:
    """Put the run's TensorBoard events so far into a checkpoint folder about to be uploaded (`tracking/tensorboard`
    in the checkpoint), so that they reach the run's storage and a resumed run on another node continues them."""
    import shutil

    tracker.flush()
    if os.path.isdir(tracker.events_dir):
        try:
            shutil.copytree(tracker.events_dir, os.path.join(checkpoint_dir, CHECKPOINT_EVENTS_DIR),
                            dirs_exist_ok=True)
        except OSError as error:  # a tracker must never stop training
            log.warning("tracking: TensorBoard events left out of checkpoint %s: %s", checkpoint_dir, error)


def publish_events(tracker: Tracker) -> str | None:
    """At the end of a run on URI storage, copy the TensorBoard events from the node's disk to
    `<run dir>/tracking/tensorboard` (what `tensorboard --logdir s3://...` reads); returns where, None for a local
    run folder (the events are already in it) or when the copy failed (warned)."""
    from app import storage

    if not storage.is_uri(tracker.run_dir) or not os.path.isdir(tracker.events_dir):
        return None
    target = storage.join(tracker.run_dir, CHECKPOINT_EVENTS_DIR)
    try:
        storage.upload_dir(tracker.events_dir, target)
    except Exception as error:  # a tracker must never fail a finished run
        log.warning("tracking: TensorBoard events not copied to %s: %s: %s", target, type(error).__name__, error)
        return None
    return target
